"""The sample format shared by data prep and training: records, label tables, atomic writes."""
