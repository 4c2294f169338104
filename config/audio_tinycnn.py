# TinyCNN (23,491 parameters), seed 001's student baseline: python train_audio.py config/audio_tinycnn.py
out_dir = 'out/audio_tinycnn'
arch = 'tinycnn'
