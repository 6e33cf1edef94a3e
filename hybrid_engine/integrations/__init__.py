"""Other frameworks' trainers generating through HybridEngine, one module per framework (each imports
its framework, so import the module you need: `import hybrid_engine` never loads any of them)."""
