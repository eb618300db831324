"""Writes tests/fixtures/transformers_t5: two tiny T5 checkpoints and what transformers' PyTorch T5
computes on them, for the torch-free compatibility tests (tests/test_transformers_fixtures.py).

  python scripts/make_transformers_fixtures.py [OUT_DIR]     # needs torch (requirements-test.txt)

For each flavour (v1.0 and v1.1, as scripts/make_test_assets.py makes them) OUT_DIR/<version>/ holds the
checkpoint (config.json, model.safetensors, spiece.model) and reference.npz: a padded batch of inputs
and targets, the reference's logits and mean token loss on it, and its greedy and beam-search outputs
(the study's decoding: 4 beams, repetition penalty 2.5). Each output is checked here to be no near-tie
(every greedy choice and every returned beam leads the runner-up by over MARGIN), so that float32
rounding on another machine or JAX version cannot flip a token the tests compare exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_test_assets  # noqa: E402

TEXTS = [
  "premise: the movie was great [SEP] hypothesis: good",
  "one two",
  "question: who is the old cat that was on the mountain and by the river? answer: the dog",
]
TARGETS = ["positive", "a blue bird in the city", "no"]
MAX_LENGTH = 8  # generated tokens
BEAMS = dict(num_beams=4, repetition_penalty=2.5)
MARGIN = 1e-3  # log-probability lead of each compared choice over the runner-up


def _encode(tokenizer, texts):
  import numpy as np

  out = tokenizer(texts, padding=True, return_tensors="np")
  return out.input_ids.astype(np.int32), out.attention_mask.astype(np.int32)


def _pad_after_eos(tokens, eos: int, max_length: int):
  import numpy as np

  out = np.zeros((len(tokens), max_length), np.int32)
  for i, row in enumerate(np.asarray(tokens)):
    stops = np.flatnonzero(row == eos)
    n = stops[0] + 1 if stops.size else len(row)
    out[i, :n] = row[:n]
  return out


def reference_outputs(checkpoint: Path) -> dict:
  """What transformers' PyTorch T5 computes on the checkpoint: logits, loss, greedy and beam outputs."""
  import numpy as np
  import torch
  from transformers import T5ForConditionalGeneration

  from mpt_jax.model.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(checkpoint)
  model = T5ForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
  input_ids, input_mask = _encode(tokenizer, TEXTS)
  target_ids, target_mask = _encode(tokenizer, TARGETS)
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)  # noqa: E731
  labels = np.where(target_mask == 1, target_ids, -100)
  # transformers' cache breaks when the decoder is deeper than the encoder (DESIGN.md).
  use_cache = model.config.num_decoder_layers <= model.config.num_layers
  eos = model.config.eos_token_id
  with torch.no_grad():
    out = model(input_ids=t(input_ids), attention_mask=t(input_mask), labels=t(labels))
    common = dict(
      attention_mask=t(input_mask),
      max_new_tokens=MAX_LENGTH,
      do_sample=False,
      use_cache=use_cache,
      eos_token_id=eos,
      pad_token_id=0,
      output_scores=True,
      return_dict_in_generate=True,
    )
    greedy = model.generate(t(input_ids), num_beams=1, **common)
    beams = model.generate(t(input_ids), num_return_sequences=BEAMS["num_beams"], **BEAMS, **common)
  for step, scores in enumerate(greedy.scores):  # log-probabilities of each step's tokens
    top2 = torch.topk(torch.log_softmax(scores, -1), 2, dim=-1).values
    finished = (greedy.sequences[:, 1 : step + 1] == eos).any(-1)
    lead = (top2[:, 0] - top2[:, 1])[~finished]
    assert (lead > MARGIN).all(), f"{checkpoint}: greedy step {step} is a near-tie ({lead.min():.2e})"
  scores = beams.sequences_scores.reshape(len(TEXTS), BEAMS["num_beams"])
  lead = scores[:, 0] - scores[:, 1]
  assert (lead > MARGIN).all(), f"{checkpoint}: the best beam is a near-tie ({lead.min():.2e})"
  best = beams.sequences.reshape(len(TEXTS), BEAMS["num_beams"], -1)[:, 0]
  return {
    "input_ids": input_ids,
    "input_mask": input_mask,
    "target_ids": target_ids,
    "target_mask": target_mask,
    "logits": out.logits.numpy(),
    "loss": np.float32(out.loss.item()),
    "greedy": _pad_after_eos(greedy.sequences.numpy()[:, 1:], eos, MAX_LENGTH),
    "beam": _pad_after_eos(best.numpy()[:, 1:], eos, MAX_LENGTH),  # without the decoder start token
  }


def main(argv=None) -> None:
  import numpy as np
  import torch
  import transformers

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir", nargs="?", default=str(REPO / "tests" / "fixtures" / "transformers_t5"))
  args = parser.parse_args(argv)
  out_dir = Path(args.out_dir)
  torch.set_num_threads(1)
  for version in sorted(make_test_assets.VERSIONS):
    checkpoint = make_test_assets.make_hf_t5(out_dir / version, version)
    np.savez(checkpoint / "reference.npz", **reference_outputs(checkpoint))
  made_with = {
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "max_length": MAX_LENGTH,
    **BEAMS,
    "texts": TEXTS,
    "targets": TARGETS,
  }
  (out_dir / "made_with.json").write_text(json.dumps(made_with, indent=2) + "\n")
  print(f"wrote {out_dir}: {made_with}")


if __name__ == "__main__":
  main()
