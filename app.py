"""Serve the dermaclass Gradio app: `python app.py [--model BUNDLE] [--port 7860]`.

Decision support, not a diagnostic device. The UI lives in dermaclass/ui/ (app: the Gradio tabs; views: what they show).
"""

from dermaclass.cli import main

if __name__ == "__main__":
    import sys

    sys.argv[1:1] = ["serve"]
    main()
