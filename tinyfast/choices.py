"""The closed sets of values some arguments take, each spelled once: the package checks its arguments against
these tuples and the CLI builds its typer choices from them. Nothing is imported here, so that `--help` does
not wait for torch."""

SCHEDULES = ("one-cycle", "plateau")              # fit: fit_one_cycle, or SGD + ReduceLROnPlateau
TRACKERS = ("csv", "tensorboard", "wandb")        # fit --log: metrics.csv always; the others add fastai's callback
PRECISIONS = ("auto", "bf16", "fp16", "fp32")     # tiny_learner: auto is bf16 where the device computes it natively,
                                                  # fp16 (loss-scaled) on a GPU below compute capability 8.0
STEMS = ("cifar", "imagenet")                     # resnet18: 3x3 stride 1, or 7x7 stride 2 + max-pool
MODES = ("fastai", "smith")                       # the LR range tests (find-lr --mode, fit --lr-mode)
FORMATS = ("onnx", "torchscript")                 # export --format
CAM_METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam")
