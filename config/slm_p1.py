# Seed 003's Phase-1 model on the built-in corpus (the running Python's stdlib sources):
# python train_slm.py config/slm_p1.py
# Every P1 decision is a default of train_slm.py already; they are spelled out here so the config reads as the spec.
out_dir = 'out/slm_p1'
block_size = 256
stride = 256
batch_size = 16
n_layer = 4
n_head = 4
n_embd = 256
d_ff = 1024
dropout = 0.1  # seed 003's dropout, on each residual branch; for nanoGPT's placement add the two below at 0.1
attn_dropout = 0.0  # on attention probabilities: 0.1 takes SDPA off its fused CPU kernel, for no quality gain
embd_dropout = 0.0  # on the embeddings: 0.1 slows learning within the first epoch (docs/slm.md, Notes)
learning_rate = 3e-4
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
max_iters = 2000
eval_interval = 200
