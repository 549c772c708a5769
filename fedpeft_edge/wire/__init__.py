"""Wire format: framed FedML messages, manifest-checked tensor updates, and chunking."""
