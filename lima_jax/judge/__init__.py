"""Model judges of generated answers, as the LIMA paper used GPT-4 and ChatGPT.

prompts   the questions asked (versioned: a judgement records the version it was asked with)
verdicts  reading a verdict out of a judge's reply, and FastChat's order-swap rule
client    the judge as one method (messages -> reply text and token usage), over HTTP here
answers   reading `lima-evaluate` answer files, validated line by line
run       the loop: what to ask, in parallel, saved as it goes, resumed without asking twice
summaries what `lima-compare` reports from Likert judgements, and the figures' x values
"""
