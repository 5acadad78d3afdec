from lightning_peft.data.audio_folder import AudioFolder
from lightning_peft.data.digits import Digits
from lightning_peft.data.image_folder import ImageFolder
from lightning_peft.data.spoken_keywords import SpokenKeywords
from lightning_peft.data.text_classification_file import TextClassificationFile
from lightning_peft.data.text_files import TextFiles
from lightning_peft.data.tweet_sentiment import TweetSentiment

__all__ = [
    "AudioFolder",
    "Digits",
    "ImageFolder",
    "SpokenKeywords",
    "TextClassificationFile",
    "TextFiles",
    "TweetSentiment",
]
