"""Pure-torch core of Flux QLoRA Lab. Never imports ComfyUI, so it is testable on its own."""
