"""Language-model backbones beside timm: a causal LM (SmolLM2 from its package's GGUF, or any local HF model)
and an encoder text classifier (MiniLM), their tokenizers, text data on the device, and their export.

`spec.TextSpec` is what a text backbone expects as input (the image backbones' `InputSpec` counterpart);
`backbone.build_text_backbone` is called by `fedpeft_edge.backbone.build_backbone` for model_args.family
causal_lm / text_classifier; `data` reads text sources and builds the packed (causal LM) or padded datasets.
"""
