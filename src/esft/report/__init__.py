"""`esft report`: every method of the paper's tables, trained and scored locally, written as Markdown."""
