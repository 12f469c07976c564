"""The condition language of alert rules and optimizer triggers: the parser (parse), the parsed tree
(tree) and where a condition reads its values (sources)."""
