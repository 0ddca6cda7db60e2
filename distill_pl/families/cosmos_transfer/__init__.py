"""The Cosmos-Transfer2.5 family: the base + ControlNet adapter (:mod:`.adapter`,
``CosmosTransferDenoiser``), its published configs and class names (:mod:`.configs`), its
student export as a full ``Cosmos2_5_TransferPipeline`` folder (:mod:`.export`), its text
embedding (:mod:`.text_encoder`, Qwen2.5-VL) and the padding-mask resize its diffusers models
need without torchvision (:mod:`.padding_resize`). Nothing is imported here: the registry
imports the adapter only when a folder of its class is loaded."""
