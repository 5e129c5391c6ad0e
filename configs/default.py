"""The embedded default: CRBG on scikit-learn's bundled 8x8 digits, a 64-256-256-10 MLP.

    python run.py
"""
import ml_collections

from slt_jax.masking import DEFAULT_POLICY
from slt_jax.methods import METHODS, method_hyperparameters


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "digits_mlp"
    c.method = "crbg"
    c.dataset = "digits"
    c.sparsity = 0.8  # target fraction of gated weights removed
    c.batch_size = 64
    c.num_steps = 0  # 0: use num_epochs
    c.num_epochs = 60
    c.seed = 0

    # None: the method's own recipe (CRBG: Adam 0.05 constant; edge-popup: SGD 0.1 cosine;
    # supermask: SGD 100 constant; biprop, iterand: edge-popup's).
    c.learning_rate = ml_collections.config_dict.placeholder(float)
    c.lr_schedule = ml_collections.config_dict.placeholder(str)  # "constant" or "cosine"
    c.warmup_epochs = 0.0  # linear learning-rate warm-up before the schedule
    c.label_smoothing = 0.0
    c.logit_scale = 1.0  # temperature of the loss only (see slt_jax.train.classification_loss)

    # The random network.
    c.weight_init = "signed_kaiming"
    c.init_scale = ml_collections.config_dict.placeholder(float)  # only for weight_init="uniform"
    c.use_bias = False
    c.width = 1.0
    # The MLPs' hidden nonlinearity: "relu", or "leaky_relu" with a fixed (never trained) negative_slope
    # (None: 0.25, PReLU's usual initial value), our reading of the structured CRBG authors' "PreReLU"
    # (slt_jax.models.mlp). Other models: "relu" only.
    c.activation = "relu"
    c.negative_slope = ml_collections.config_dict.placeholder(float)  # only for activation="leaky_relu"
    # How the step holds the frozen weights (memory, not results). "bfloat16" halves their bytes; the
    # ticket is then defined on the bf16-rounded weights and records it. regenerate_frozen=True keeps
    # only the seed and re-runs the initialisers inside every step: same ticket, no weight buffer.
    c.frozen_dtype = "float32"
    c.regenerate_frozen = False
    # A params file (.npz keyed by path name, e.g. Dense_0/kernel) to start from instead of the seed's
    # weights, e.g. pretrained ones; the ticket records its sha256 and refuses other weights. "": the seed.
    c.frozen_from = ""

    # Which leaves carry gates, and one gate per weight or per output unit.
    c.gate_policy = DEFAULT_POLICY
    c.structured = False
    c.structured_policy = ""  # with structured: regex of the gated leaves that get unit gates ("" = all);
    # the other gated leaves keep one gate per weight
    c.structured_inputs = ""  # with structured: regex of Dense/Conv kernels that get one gate per input
    # feature / channel instead (a pixel on the first layer; a hidden unit on the layer after it)
    c.ticket_coding = "packbits"  # how ticket/mask.npz stores the mask: "packbits" or "golomb"

    # Each method's own hyperparameters, c.<method>, with the defaults of its dataclass (one source of truth):
    # crbg: family, lambda_mode, lam, dual_lr, dual_kp, temp_start, temp_end, decision_weight, binary_rule,
    # density_constraint (how the budget is split over layers), gate_margin, target_ramp, controller,
    # geometric_gain, geometric_kp, project_on_miss, landing_tolerance, shift_onto_target (how the ticket lands
    # on the target)
    # (slt_jax.methods.crbg.CRBG); edgepopup and biprop: scope, momentum, weight_decay
    # (...edgepopup.EdgePopup, ...biprop.Biprop); supermask: sparsity_control ("dual": the multiplier
    # holds --config.sparsity; "none": the paper's uncontrolled masks), score_init, lam, dual_lr, dual_kp
    # (...supermask.Supermask); iterand: edge-popup's and redraw_every, redraw_fraction (...iterand.IteRand).
    for name in METHODS:
        c[name] = ml_collections.ConfigDict(method_hyperparameters(name))

    # Data.
    c.val_fraction = 0.1
    c.split_seed = 0
    c.num_classes = 10  # for synthetic data; other datasets read it from their labels
    c.synthetic_shape = (28, 28, 1)
    c.synthetic_size = 512  # examples of synthetic data
    # TFDS datasets only (mnist, fashion_mnist, cifar10, imagenet2012, tfds:NAME). augment: "cifar" (4-px
    # pad-crop + flip), "imagenet" (random-resized crop + flip; eval resize 256 + centre crop 224), "none",
    # or "auto" (by image size, see slt_jax.data.tfds_source).
    c.augment = "auto"
    c.tfds_data_dir = ""  # where prepared datasets live; "": $TFDS_DATA_DIR, else ~/tensorflow_datasets

    # Bookkeeping (may change between a run and its resumption).
    c.log_every = 20
    c.eval_every = 200
    c.checkpoint_every = 500
    c.eval_batch_size = 1000
    # Models with BatchNorm: after training, the ticket's running statistics are recomputed on the
    # binary ticket over this many training batches (0: keep those averaged under the training masks).
    c.bn_recalibration_batches = 40
    c.num_devices = 0  # 0: every device JAX sees
    c.progress = True
    c.plots = True
    c.distributed = False
    return c
