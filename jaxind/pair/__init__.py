"""One pair of models: what each test is (`catalog`), the registry behind one calling convention (`registry`),
the token data tests read (`inputs`), the run (`runner`) and its report (docs/DESIGN.md §2)."""
