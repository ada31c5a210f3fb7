"""What both fakes share: the model behind them (K2 Horizon: its id, its chat template's thinking fields and
efforts, its answer to an empty prompt), and text cut into the pieces it streams in."""

MODEL = "IFM/K2-Horizon-375B-A23B"
THINKING_FIELDS = ("think", "reasoning", "reasoning_content", "think_fast", "think_faster")
EFFORTS = ("low", "medium", "high")
EMPTY_PROMPT_REPLY = {"reasoning": "The message is empty. I should ask what the user would like.",
                      "answer": "It looks like your message came through empty. What would you like to talk about?"}


def pieces_of(text, size):
    """`text` in pieces of `size` characters, as a stream carries it."""
    return [text[start:start + size] for start in range(0, len(text), size)]
