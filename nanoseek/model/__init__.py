from nanoseek.model.dense import DenseTransformer, build_model
from nanoseek.model.transformer import IGNORE_INDEX, DeepSeekV3, LossOutput

__all__ = ["IGNORE_INDEX", "DeepSeekV3", "DenseTransformer", "LossOutput", "build_model"]
