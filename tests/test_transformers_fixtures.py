"""Our loader and T5 against what transformers' PyTorch T5 computed on two committed tiny checkpoints
(tests/fixtures/transformers_t5, made by scripts/make_transformers_fixtures.py): the parity of
tests/test_t5_parity.py and tests/test_decode.py without torch, so that it also runs in the newest-JAX
environment (launch.sh test), where torch is not installed.

Tolerances: the logits are float32 sums over d_model 16 of tiny random weights, computed in another
order by another library: 1e-5 of the largest (about 80 float32 ulps of it), not one machine's printout. Tokens are compared exactly: the
script checked that every compared choice leads its runner-up by over 1e-3 in log-probability, far beyond
any float32 reordering.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from mpt_jax.decode import beam_search, greedy_decode
from mpt_jax.model.hf import load_pretrained
from mpt_jax.model.loss import seq2seq_loss, shift_right

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("fast_compile")]

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "transformers_t5"
MADE_WITH = json.loads((FIXTURES / "made_with.json").read_text())


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def loaded(request):
  model, params, tokenizer = load_pretrained(FIXTURES / request.param)
  reference = dict(np.load(FIXTURES / request.param / "reference.npz"))
  return model, params, tokenizer, reference


def test_the_tokenizer_gives_the_inputs_the_reference_was_given(loaded):
  _, _, tokenizer, reference = loaded
  for texts, ids, mask in (("texts", "input_ids", "input_mask"), ("targets", "target_ids", "target_mask")):
    out = tokenizer(MADE_WITH[texts], padding=True, return_tensors="np")
    np.testing.assert_array_equal(out.input_ids, reference[ids])
    np.testing.assert_array_equal(out.attention_mask, reference[mask])


def test_logits_and_loss_equal_the_references(loaded):
  model, params, _, reference = loaded
  batch = {k: reference[k] for k in ("input_ids", "input_mask", "target_ids", "target_mask")}

  @jax.jit
  def ours(params, batch):
    logits = model.apply(
      {"params": params},
      batch["input_ids"],
      batch["input_mask"],
      shift_right(batch["target_ids"], 0),
      shift_right(batch["target_mask"], 1),
    )
    return logits, seq2seq_loss(model, params, None, batch, None, deterministic=True)

  logits, loss = ours(params, batch)
  valid = batch["target_mask"] == 1  # the reference's decoder saw no mask: its padded positions differ
  scale = np.abs(reference["logits"][valid]).max()
  np.testing.assert_allclose(np.asarray(logits)[valid], reference["logits"][valid], atol=1e-5 * scale, rtol=0)
  np.testing.assert_allclose(float(loss), float(reference["loss"]), rtol=1e-5)


def test_greedy_and_beam_search_give_the_references_tokens(loaded):
  model, params, _, reference = loaded
  ids, mask, eos = reference["input_ids"], reference["input_mask"], model.config.eos_token_id
  greedy = greedy_decode(model, params, ids, mask, max_length=MADE_WITH["max_length"], eos_token_id=eos)
  np.testing.assert_array_equal(np.asarray(greedy), reference["greedy"])
  beams = beam_search(
    model,
    params,
    ids,
    mask,
    max_length=MADE_WITH["max_length"],
    num_beams=MADE_WITH["num_beams"],
    repetition_penalty=MADE_WITH["repetition_penalty"],
    eos_token_id=eos,
  )
  np.testing.assert_array_equal(np.asarray(beams), reference["beam"])
  assert not np.array_equal(reference["beam"], reference["greedy"])  # the beams found other outputs
