from nanoseek.model.transformer import IGNORE_INDEX, DeepSeekV3, LossOutput

__all__ = ["DeepSeekV3", "LossOutput", "IGNORE_INDEX"]
