"""Private training data: GLUE, Yelp, generic files, a generated demo set; tokenisation and collation."""

from dist_dpc.data.config import TASKS, DataConfig
from dist_dpc.data.loading import load_task
from dist_dpc.data.splits import TaskData, TextSplit
from dist_dpc.data.tokenize import TokenizedDataset, check_labels, collate, tokenize_split

__all__ = ["TASKS", "DataConfig", "TaskData", "TextSplit", "TokenizedDataset", "check_labels", "collate", "load_task",
           "tokenize_split"]
