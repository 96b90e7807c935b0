"""What the command-line servers print (streamer/console.py)."""


def test_ready_line_names_where_the_token_goes_never_the_token():
    """Both servers print the same ready line (streamer.console); the URL after 'open ' is what scripts read, and
    with a token it carries a placeholder: the function is never given the token, so it cannot print it."""
    import inspect

    from streamer.console import listen_error, ready_line
    assert set(inspect.signature(ready_line).parameters) == {"url", "token_required", "detail"}
    plain = ready_line("http://127.0.0.1:8080/", False)
    assert plain.split("open ")[1].split()[0] == "http://127.0.0.1:8080/" and "token" not in plain
    guarded = ready_line("http://127.0.0.1:8080/", True, "2 workers")
    assert guarded.split("open ")[1].split()[0] == "http://127.0.0.1:8080/?token=<token>"
    assert "(2 workers; Ctrl+C stops)" in guarded and "--token-file" in guarded
    msg = listen_error("0.0.0.0", 80, PermissionError(13, "Permission denied"))
    assert msg == "run_server.py: error: cannot listen on 0.0.0.0:80: Permission denied"
