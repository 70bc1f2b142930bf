"""fewstep core ops: pure torch, never imports comfy or lightning."""
