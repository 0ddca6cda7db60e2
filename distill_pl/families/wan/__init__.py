"""The Wan family: Wan 2.1 / 2.2 text-to-video (:mod:`.adapter`, ``WanDenoiser``) and Wan 2.1
VACE (:mod:`.vace`, ``WanVACEDenoiser``), their published configs (:mod:`.configs`) and the
closed-form forward FLOPs (:mod:`.flops`). Nothing is imported here: the registry imports an
adapter only when a folder of its class is loaded."""
