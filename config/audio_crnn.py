# CRNN (73,411 parameters), seed 001's teacher: python train_audio.py config/audio_crnn.py
# (the teacher lr grid of seed 001: --learning_rate=0.002 / 0.001 / 0.0005)
out_dir = 'out/audio_crnn'
arch = 'crnn'
