"""`pieval leaderboard`: lm-eval results -> the paper's tables (CSV), reference rows and plots."""
