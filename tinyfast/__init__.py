"""tinyfast: train and understand a ResNet18 on TinyImageNet with fastai."""
