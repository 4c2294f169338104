# Distil the CRNN teacher into TinyCNN (seed 001): python train_kd.py config/kd_tinycnn.py --alpha=0.6 --temperature=4
# (teacher: python train_audio.py config/audio_crnn.py; gate baselines: config/audio_tinycnn.py, audio_tinycnn_cbam.py)
out_dir = 'out/kd_tinycnn'
arch = 'tinycnn'
teacher_ckpt = 'out/audio_crnn/best.pt'
gate_baselines = ['out/audio_tinycnn', 'out/audio_tinycnn_cbam']
