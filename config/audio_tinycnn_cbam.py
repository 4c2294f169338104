# TinyCNN-CBAM at seed 001's best setting, reduction 8, kernel 3 (23,801 parameters):
# python train_audio.py config/audio_tinycnn_cbam.py   (the r x k grid: sweep.py config/campaign_audio.py)
out_dir = 'out/audio_tinycnn_cbam'
arch = 'tinycnn_cbam'
cbam_reduction = 8
cbam_kernel = 3
