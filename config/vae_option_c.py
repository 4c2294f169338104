# Seed 002's option C on the built-in colour grids (C = 10, ~93% background): focal loss gamma 1 with the full
# inverse class weights. Quick test (5 epochs):
# python train_vae.py config/vae_option_c.py --quick_test=True
out_dir = 'out/vae_option_c'
dataset_kind = 'grids'
objective = 'beta'  # the seed's plain beta-VAE
num_images = 10_000
recon_loss = 'focal'
focal_gamma = 1.0
use_class_weights = True
class_weight_method = 'inverse'
max_epochs = 20
