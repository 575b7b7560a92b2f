"""scripts/fluxq_quantize.py refuses bad requests before loading ComfyUI or any model (the bake
itself is FluxQSaveGGUF's code path, tested through the server in test_workbench.py)."""

import fluxq_quantize


def run(argv, capsys):
    code = fluxq_quantize.main(argv)
    return code, capsys.readouterr().err


def test_unknown_type_existing_output_and_missing_files_are_refused(tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    out = tmp_path / "out.gguf"
    code, err = run([str(model), str(out), "--type", "Q4_K_M"], capsys)
    assert code == 2 and "--type 'Q4_K_M'" in err and "Q4_K" in err
    out.write_bytes(b"user data")
    code, err = run([str(model), str(out), "--type", "Q8_0"], capsys)
    assert code == 2 and f"{out} exists; pass --overwrite" in err
    assert out.read_bytes() == b"user data"
    code, err = run([str(tmp_path / "missing.gguf"), str(tmp_path / "new.gguf"), "--type", "Q8_0"], capsys)
    assert code == 2 and "no model file" in err
    code, err = run([str(model), str(tmp_path / "new.gguf"), "--type", "Q8_0", "--lora", "nope.safetensors:0.5"], capsys)
    assert code == 2 and "no file 'nope.safetensors'" in err


def test_lora_specs_take_an_optional_strength(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    assert fluxq_quantize.lora_specs([f"{lora}:0.8", str(lora)]) == [(str(lora), 0.8), (str(lora), 1.0)]


def test_a_full_disk_is_reported_not_raised(tmp_path, capsys, monkeypatch):
    from lora_ops.atomic import DiskFullError

    def full(args):
        raise DiskFullError(str(tmp_path / "out.gguf"), needed=3 << 20)

    monkeypatch.setattr(fluxq_quantize, "run", full)
    code, err = run([str(tmp_path / "model.gguf"), str(tmp_path / "out.gguf"), "--type", "Q8_0"], capsys)
    assert code == 2 and "not enough disk space to write" in err and "it needs 3.0 MiB" in err
