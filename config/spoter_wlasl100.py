# SPOTER on WLASL100 (100 classes) from the released SPOTER CSVs, batched, frame order learned:
# python train_spoter.py config/spoter_wlasl100.py --train_csv=WLASL100_train_25fps.csv \
#     --val_csv=WLASL100_val_25fps.csv --test_csv=WLASL100_test_25fps.csv
out_dir = 'out/spoter_wlasl100'
num_classes = 100
pos_embedding = 'learned'
batch_size = 32
opt = 'adamw'
learning_rate = 3e-4
max_epochs = 350
