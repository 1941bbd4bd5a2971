"""Runtime: attention modules, language-model helpers, healing."""
