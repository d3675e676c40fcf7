"""SentenceVAE surgery: sentence encoder/decoder (`vae`), segmentation (`segment`) and the sentence-level
LM over a causal LM's layers (`sllm`)."""
