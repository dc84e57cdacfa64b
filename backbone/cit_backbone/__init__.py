"""The shared model code of cit: what the trainer and the server both need.

request -> images.decode_image -> VisionTower.encode -> Connector (per task) -> LanguageModel.generate -> tokens
"""
