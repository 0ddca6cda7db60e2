"""The Cosmos 2.5 family: Cosmos-Transfer2.5's base + ControlNet adapter (:mod:`.adapter`,
``CosmosTransferDenoiser``) and Cosmos-Predict2.5's adapter, the same transformer without a
ControlNet (:mod:`.predict`, ``CosmosPredictDenoiser``), their published configs and class
names (:mod:`.configs`), long videos sampled in chunks as the Transfer pipeline does
(:mod:`.chunks`), the student export as a full pipeline folder (:mod:`.export`), the text
embedding (:mod:`.text_encoder`, Qwen2.5-VL) and the padding-mask resize its diffusers models
need without torchvision (:mod:`.padding_resize`). Nothing is imported here: the registry
imports an adapter only when a folder of its class is loaded."""
