# Distil the CRNN teacher into TinyCNN-CBAM at seed 001's best setting (r 8, k 3; upstream's best KD: alpha 0.9, T 3):
# python train_kd.py config/kd_tinycnn_cbam.py --alpha=0.9 --temperature=3
out_dir = 'out/kd_tinycnn_cbam'
arch = 'tinycnn_cbam'
cbam_reduction = 8
cbam_kernel = 3
teacher_ckpt = 'out/audio_crnn/best.pt'
gate_baselines = ['out/audio_tinycnn', 'out/audio_tinycnn_cbam']
