"""What to install when a backend is missing: one line each, shared by the kind table and the modules it names."""

TRT_INSTALL_HINT = ("install the extra on a machine with an NVIDIA GPU and driver: pip install 'flowblend[trt]' "
                    "(tensorrt>=10.1 and cuda-python); or use --backend onnxruntime")
