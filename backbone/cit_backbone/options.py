"""The words of the --device / --dtype options, importable without torch (CLIs show them in --help before they load
anything heavy); numerics.Numerics.resolve turns them into a device and a dtype."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N"
DTYPE_HELP = ("the frozen language model's precision: float32, bfloat16 (faster: a training step 0.64-0.74x, a "
              "decode step 0.83x on an AVX-512 BF16 CPU; but the main job answered 1.9 points worse, 3.4 on "
              "held-out wordings) or float16. Serve a task in the precision it was trained in: the server warns "
              "when they differ")
