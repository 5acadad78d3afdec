from lightning_peft.data.digits import Digits
from lightning_peft.data.spoken_keywords import SpokenKeywords
from lightning_peft.data.text_files import TextFiles
from lightning_peft.data.tweet_sentiment import TweetSentiment

__all__ = ["Digits", "SpokenKeywords", "TextFiles", "TweetSentiment"]
