# SPOTER on LSA64 (64 classes) from SPOTER-format CSVs, batched, frame order learned:
# python train_spoter.py config/spoter_lsa64.py --train_csv=LSA64_train.csv --val_csv=LSA64_val.csv \
#     --test_csv=LSA64_test.csv
out_dir = 'out/spoter_lsa64'
num_classes = 64
pos_embedding = 'learned'
batch_size = 32
opt = 'adamw'
learning_rate = 3e-4
max_epochs = 350
