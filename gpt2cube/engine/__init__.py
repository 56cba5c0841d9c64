"""Python side of the C++ routed-inference engine (cpp/): building it against the installed
ggml, and a ctypes binding."""
