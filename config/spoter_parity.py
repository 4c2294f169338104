# The original SPOTER recipe, for reproducing the paper: one positional vector (no frame order), SGD lr 1e-3 without
# momentum, batch size 1, 100 epochs, seed 379. Add the CSVs:
# python train_spoter.py config/spoter_parity.py --train_csv=... --val_csv=... --test_csv=...
out_dir = 'out/spoter_parity'
pos_embedding = 'single'
opt = 'sgd'
learning_rate = 1e-3
momentum = 0.0
weight_decay = 0.0
batch_size = 1
bucket_by_length = False
max_epochs = 100
seed = 379
