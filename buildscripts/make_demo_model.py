"""Make a small local model offline: python buildscripts/make_demo_model.py DIR [--kind llama|gpt2|llama-1b]."""
import sys

from llem_server.demo import main

if __name__ == "__main__":
    sys.exit(main())
