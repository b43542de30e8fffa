"""Data: the default corpus, tokenizers and the deterministic, resumable batch pipeline."""
from jaxlm.data.corpus import CorpusDownloadError, CorpusError, load_documents, split_documents
from jaxlm.data.pipeline import (DataError, TrainIterator, ValBatches, load_split_tokens, make_train_iterator,
                                 make_val_batches, prepare_tokens, unigram_entropy)
from jaxlm.data.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, get_tokenizer

__all__ = [
    "ByteTokenizer", "CorpusDownloadError", "CorpusError", "DataError", "Tokenizer", "TokenizerError",
    "TrainIterator", "ValBatches", "get_tokenizer", "load_documents", "load_split_tokens",
    "make_train_iterator", "make_val_batches", "prepare_tokens", "split_documents", "unigram_entropy",
]
