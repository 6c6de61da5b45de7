"""Fuzzing the probe and decode of every format (issue #24): mutated honest files (pydicom's test files of each
transfer syntax, PNG, JPEG, TIFF, the samples' DICOM; :func:`medsr_dist.data.hostile.fuzz_seeds`) either decode or
raise the project's own ImageDecodeError — never another exception class, never a hang, never an allocation a
lying header asked for. Short here (a few hundred cases, deadline per case); ``jobs/fuzz_decoders.py --minutes N``
runs the same cases for longer, each under a memory and time cap in a child process.
"""
from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsr_dist.data.hostile import fuzz_seeds, mutate
from medsr_dist.io.image import ImageDecodeError, decode_image, probe_image

SEEDS = fuzz_seeds()
#: Decoded only when the probe says at most this many samples (the header limits' stand-in): what a decoder then
#: allocates is bounded by the codestream checks, which is what is being tested.
MAX_SAMPLES = 8_000_000


def probe_and_decode(data: bytes) -> str:
    """"refused" (ImageDecodeError, including NotAnImageObject), "limit" (probe over MAX_SAMPLES) or "ok"."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = probe_image(data, "fuzz")
            if probe.pixels * probe.channels > MAX_SAMPLES:
                return "limit"
            decode_image(data, "fuzz")
    except ImageDecodeError:
        return "refused"
    return "ok"


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes(name):
    assert probe_and_decode(SEEDS[name]) == "ok"


ops = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1 << 24), st.integers(0, 1 << 16)), min_size=1, max_size=6)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(SEEDS)), mutations=ops)
def test_mutated_files_decode_or_raise_image_decode_error(name, mutations):
    probe_and_decode(mutate(SEEDS[name], mutations))  # any other exception fails the case


#: Crash classes the fuzzers found, each as its seed and mutation, with what they did before the fix.
FOUND = [
    # pylibjpeg-rle panicked ("index out of bounds"): pyo3's PanicException is a BaseException, so it escaped every
    # `except Exception` (the nightly read stage's, Serve's) and failed the task
    ("MR_small_RLE.dcm", [(5, 6081301, 51361)]),
    # a duplicated run made a command-set (0000,eeee) element: writing the header for the derived object raised
    # pydicom's ValueError
    ("examples_palette.dcm", [(6, 3477, 7)]),
]


@pytest.mark.parametrize("name, mutations", FOUND, ids=[name for name, _ in FOUND])
def test_crash_classes_found_by_fuzzing_are_refused_or_decoded(name, mutations):
    assert probe_and_decode(mutate(SEEDS[name], mutations)) in ("ok", "refused")
