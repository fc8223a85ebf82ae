# The classic baby GPT on Tiny Shakespeare characters, for one GPU (a few minutes on an A100).
# python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char.py

out_dir = "out-shakespeare-char"
eval_interval = 250  # the model overfits quickly on this small corpus: evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep the best model by val loss

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

# baby GPT
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a bigger step
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little bigger: few tokens per iteration
warmup_iters = 100
