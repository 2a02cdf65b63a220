"""The three VLsI training stages (verbalize, interact, sft) and the whole-run driver."""
