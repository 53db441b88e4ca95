"""fp32 parity of our Flax models with PyTorch diffusers/transformers on SD1- and SD2-style models."""
import pytest

from jax_inversion.models.parity import check_parity

EXPECTED_OUTPUTS = {
    ("text_encoder", "last_hidden_state"),
    ("text_encoder", "penultimate_hidden_state"),
    ("unet", "noise_prediction"),
    ("vae", "latent_mean"),
    ("vae", "decoded_image"),
}


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2"])
def test_fp32_parity_below_1e4(fixture, request):
    results = check_parity(request.getfixturevalue(fixture), latent_size=16)
    assert {(r.component, r.output) for r in results} == EXPECTED_OUTPUTS
    for r in results:
        assert r.max_abs_reference > 0.1, f"{r.component}/{r.output} reference is degenerate"
        assert r.max_abs_diff < 1e-4, f"{r.component}/{r.output}: {r.max_abs_diff:.3e}"
