"""Private training data: GLUE, Yelp, generic files, a generated demo set; tokenisation and collation."""

from dist_dpc.data.config import TASKS, DataConfig
from dist_dpc.data.labels import resolve_num_labels
from dist_dpc.data.lm import IGNORE, LMDataset, collate_lm, tokenize_lm
from dist_dpc.data.loading import load_lm_task, load_task
from dist_dpc.data.splits import TaskData, TextSplit
from dist_dpc.data.tokenize import PAD_MULTIPLE, TokenizedDataset, check_labels, collate, tokenize_split

__all__ = ["IGNORE", "PAD_MULTIPLE", "TASKS", "DataConfig", "LMDataset", "collate_lm", "load_lm_task", "tokenize_lm", "TaskData", "TextSplit", "TokenizedDataset", "check_labels", "collate", "load_task",
           "resolve_num_labels", "tokenize_split"]
