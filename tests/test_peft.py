"""The prompt in PyTorch, both ways: a prompt exported as a PEFT prompt-tuning adapter gives, on
transformers' T5 through `peft.PeftModel`, the logits ours gives; a PEFT-saved prompt imported here
reproduces PEFT's logits; the forms PEFT cannot express are refused, saying why.

Tolerance: float32 in two libraries (another summation order), as tests/test_t5_parity.py: 1e-5 of
the largest logit.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import helpers_t5  # noqa: E402
from mpt_jax import cli, peft_export, pipeline  # noqa: E402
from mpt_jax import prompt as prompt_lib  # noqa: E402
from mpt_jax.model.loss import shift_right  # noqa: E402

NUM_TOKENS = 4


@pytest.fixture(scope="module")
def ours(hf_t5_v11_dir):
  from mpt_jax.model.hf import load_pretrained

  model, params, _ = load_pretrained(hf_t5_v11_dir)
  batch = helpers_t5.random_batch(
    11, batch=3, input_length=7, target_length=4, vocab_size=model.config.vocab_size
  )
  decoder_input_ids = np.asarray(shift_right(batch["target_ids"], 0))
  apply = jax.jit(
    lambda prompt: model.apply(
      {"params": params}, batch["input_ids"], batch["input_mask"], decoder_input_ids, prompt=prompt
    )
  )
  return model, batch, decoder_input_ids, apply


def reference(path):
  from transformers import T5ForConditionalGeneration

  return T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def peft_logits(peft_model, batch, decoder_input_ids) -> np.ndarray:
  with torch.no_grad():
    return (
      peft_model(
        input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
        attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
        decoder_input_ids=torch.tensor(decoder_input_ids, dtype=torch.long),
      )
      .logits.float()
      .numpy()
    )


def assert_logits_close(actual, expected):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def test_an_exported_prompt_gives_our_logits_in_peft(ours, hf_t5_v11_dir, tmp_path):
  model, batch, decoder_input_ids, apply = ours
  prompt = np.random.default_rng(0).normal(size=(NUM_TOKENS, model.config.d_model)).astype(np.float32)
  npy = prompt_lib.save_prompt(
    tmp_path / "prompt.npy", prompt, {"model": str(hf_t5_v11_dir), "placement": "prepend"}
  )
  out = tmp_path / "adapter"
  assert cli.main(["export-prompt", npy, "--to=peft", str(out)]) == 0
  config = json.loads((out / peft_export.ADAPTER_CONFIG).read_text())
  assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "SEQ_2_SEQ_LM"
  assert config["num_transformer_submodules"] == 1  # PEFT's seq2seq default (2) also prompts the decoder
  assert (config["num_virtual_tokens"], config["token_dim"]) == prompt.shape
  assert config["base_model_name_or_path"] == str(hf_t5_v11_dir)

  peft_model = peft.PeftModel.from_pretrained(reference(hf_t5_v11_dir), str(out)).eval()
  loaded = peft_model.get_prompt_embedding_to_save("default").numpy()
  np.testing.assert_array_equal(loaded, prompt)  # the weights travel bitwise
  expected = np.asarray(apply(jnp.asarray(prompt)))
  assert_logits_close(peft_logits(peft_model, batch, decoder_input_ids), expected)
  assert np.abs(np.asarray(apply(None)) - expected).max() > 1e-2 * np.abs(expected).max()  # it matters
  # and the adapter comes back as the same prompt
  back, meta = peft_export.load_any_prompt(str(out), d_model=model.config.d_model)
  np.testing.assert_array_equal(back, prompt)
  assert meta["placement"] == "prepend"


def test_a_peft_saved_prompt_reproduces_peft_logits_here(ours, hf_t5_v11_dir, tmp_path):
  model, batch, decoder_input_ids, apply = ours
  torch.manual_seed(0)
  config = peft.PromptTuningConfig(
    task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NUM_TOKENS, num_transformer_submodules=1
  )
  peft_model = peft.get_peft_model(reference(hf_t5_v11_dir), config).eval()
  expected = peft_logits(peft_model, batch, decoder_input_ids)
  peft_model.save_pretrained(str(tmp_path / "saved"))

  loaded, _ = peft_export.load_any_prompt(str(tmp_path / "saved"), d_model=model.config.d_model)
  assert loaded.shape == (NUM_TOKENS, model.config.d_model)
  assert_logits_close(apply(jnp.asarray(loaded)), expected)
  # --config.init_prompt takes the adapter directory
  run_config = ml_collections.ConfigDict(
    {"init_prompt": str(tmp_path / "saved"), "method": "pt", "prompt": {"length": NUM_TOKENS}}
  )
  start = pipeline.initial_prompt_file(
    run_config, str(tmp_path / "run"), model.config.d_model, upstream=False, downstream=True
  )
  np.testing.assert_array_equal(start, loaded)


def test_an_adapter_that_also_prompts_the_decoder_is_refused(ours, hf_t5_v11_dir, tmp_path):
  model = ours[0]
  config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NUM_TOKENS)
  peft_model = peft.get_peft_model(reference(hf_t5_v11_dir), config)
  assert peft_model.peft_config["default"].num_transformer_submodules == 2  # PEFT's seq2seq default
  peft_model.save_pretrained(str(tmp_path / "two"))
  with pytest.raises(ValueError, match="num_transformer_submodules=2.*decoder"):
    peft_export.load_any_prompt(str(tmp_path / "two"), d_model=model.config.d_model)


@pytest.mark.parametrize("placement", ["after_padding", "suffix"])
def test_a_prompt_placed_after_the_input_is_refused(tmp_path, placement, capsys):
  npy = prompt_lib.save_prompt(
    tmp_path / "p.npy", np.zeros((2, 8), np.float32), {"model": "m", "placement": placement}
  )
  with pytest.raises(ValueError, match="always prepends"):
    peft_export.export_prompt(npy, str(tmp_path / "out"))
  with pytest.raises(SystemExit) as exit_info:
    peft_export.main([npy, "--to=peft", str(tmp_path / "out")])
  assert exit_info.value.code == 2 and placement in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_a_prompt_trained_in_the_channel_direction_is_refused(tmp_path):
  # the direction is read from the run's record when the sidecar does not say it
  workdir = tmp_path / "run"
  npy = prompt_lib.save_prompt(
    workdir / "upstream" / "prompt.npy", np.zeros((2, 8), np.float32), {"model": "m"}
  )
  (workdir / "run_record.json").write_text(json.dumps([{"config": {"data": {"direction": "channel"}}}]))
  with pytest.raises(ValueError, match="channel direction .*run_record.json"):
    peft_export.export_prompt(npy, str(tmp_path / "out"))
  sidecar = prompt_lib.save_prompt(
    tmp_path / "q.npy", np.zeros((2, 8), np.float32), {"model": "m", "direction": "channel"}
  )
  with pytest.raises(ValueError, match="channel direction .*sidecar"):
    peft_export.export_prompt(sidecar, str(tmp_path / "out"))
