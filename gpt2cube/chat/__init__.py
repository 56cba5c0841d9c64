"""Talking to converted models: conversation formatting and history trimming, token streams from
llama.cpp or the routed engine, the terminal chat and the local web server."""
