"""Load-failure causes from a child's output (llamarouter.core.failure), on lines as this
llama-server build prints them."""

from __future__ import annotations

from llamarouter.core.failure import classify, explain_failure

MISSING = """\
0.00.057.693 I srv    load_model: loading model '/m/nope.gguf'
0.00.057.823 E gguf_init_from_file: failed to open GGUF file '/m/nope.gguf' (No such file or directory)
0.00.057.901 E llama_model_load: error loading model: llama_model_loader: failed to load model from /m/nope.gguf
0.00.057.907 E llama_model_load_from_file_impl: failed to load model
0.00.057.937 E common_fit_params: encountered an error while trying to fit params to free device memory: failed to load model
0.00.057.944 E gguf_init_from_file: failed to open GGUF file '/m/nope.gguf' (No such file or directory)
0.00.057.947 E llama_model_load: error loading model: llama_model_loader: failed to load model from /m/nope.gguf
0.00.057.950 E cmn  common_init_: failed to load model '/m/nope.gguf'
0.00.057.952 E srv    load_model: failed to load model, '/m/nope.gguf'
0.00.057.953 I srv    operator(): operator(): cleaning up before exit...
0.00.061.972 E srv  llama_server: exiting due to model loading error""".splitlines()

CORRUPT = """\
srv    load_model: loading model '/m/bad.gguf'
gguf_init_from_reader: invalid magic characters: 'xV?q', expected 'GGUF'
llama_model_load: error loading model: llama_model_loader: failed to load model from /m/bad.gguf
llama_model_load_from_file_impl: failed to load model
srv    load_model: failed to load model, '/m/bad.gguf'
srv  llama_server: exiting due to model loading error""".splitlines()

OUT_OF_MEMORY = """\
0.00.001.000 I srv    load_model: loading model '/m/big.gguf'
0.00.002.000 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 81920.00 MiB on device 0: cudaMalloc failed: out of memory
0.00.002.100 E llama_model_load: error loading model: unable to allocate CUDA0 buffer
0.00.002.200 E srv    load_model: failed to load model, '/m/big.gguf'
0.00.002.300 E srv  llama_server: exiting due to model loading error""".splitlines()


def test_missing_file_says_no_such_file() -> None:
    failure = classify(MISSING)
    assert failure.cause == "failed to open GGUF file '/m/nope.gguf' (No such file or directory)"
    assert failure.permanent


def test_corrupt_file_says_invalid_magic() -> None:
    assert explain_failure(CORRUPT) == "invalid magic characters: 'xV?q', expected 'GGUF'"
    assert classify(CORRUPT).permanent


def test_out_of_memory_is_explained_but_may_be_retried() -> None:
    failure = classify(OUT_OF_MEMORY)
    assert failure.cause is not None and "cudaMalloc failed: out of memory" in failure.cause
    assert "unable to allocate CUDA0 buffer" in failure.cause
    assert not failure.permanent


def test_only_the_last_attempt_counts() -> None:
    # A restart of the same model after the file was fixed, which then crashed later on.
    lines = [*CORRUPT, "srv    load_model: loading model '/m/bad.gguf'", "srv  main: model loaded"]
    assert classify(lines).cause is None and not classify(lines).permanent


def test_a_crash_without_cause_lines_explains_nothing() -> None:
    lines = ["srv  main: model loaded", "srv  update_slots: all slots are idle", "Segmentation fault"]
    assert explain_failure(lines) is None
    assert explain_failure([]) is None
